"""A real OpenAI-compatible chat endpoint on 127.0.0.1 for the eval tests.

`reply(request_json) -> (status, content_or_None, delay_s)` decides each answer; every
request body is recorded so tests can count what a resumed run asked again.
"""
import contextlib
import http.server
import json
import threading
import time


@contextlib.contextmanager
def chat_server(reply):
  requests = []

  class Handler(http.server.BaseHTTPRequestHandler):

    def do_POST(self):  # noqa: N802 (http.server API)
      body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
      requests.append(body)
      status, content, delay = reply(body)
      time.sleep(delay)
      payload = (json.dumps({"choices": [{"message": {"role": "assistant",
                                                      "content": content}}]})
                 if status == 200 else "error").encode()
      try:
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
      except (BrokenPipeError, ConnectionResetError):
        pass  # the client timed out and hung up, as the timeout test intends.

    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", requests
  finally:
    server.shutdown()
    server.server_close()
    thread.join()
