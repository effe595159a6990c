"""`exgra_jax.serve` on loopback with a tiny random model: the same greedy answers as
predict, token-by-token streaming, 16 concurrent clients batched, requests joining a
running batch, every bad input a 4xx while the server keeps serving, and the project's
judge client against it."""
import base64
import concurrent.futures
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import flax.linen as nn
import jax
import PIL.Image
import pytest

from exgra_jax import run_config
from exgra_jax.data.records import Turn
from exgra_jax.llm_clients import chat_client, judge
from exgra_jax.inference import prompts, single_question
from exgra_jax.hf import exporter
from exgra_jax.models import llava
from exgra_jax.models.config import LlavaConfig
from exgra_jax.models.llava import LlavaModel
from exgra_jax.serving import engine as engine_lib
from exgra_jax.serving import http_api, slots
from exgra_jax.serving.requests import Conversation, Limits
from exgra_jax.weights import loading

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def model_dir(demo_world, tmp_path_factory) -> str:
  """A params checkpoint of a tiny random model with the demo tokenizer."""
  config = run_config.load(os.path.join(REPO, "configs", "demo.py"), [])
  model = LlavaModel(LlavaConfig.from_config(config.model))
  params = nn.unbox(llava.init_boxed_params(model.cfg, jax.random.key(0)))
  directory = str(tmp_path_factory.mktemp("serve") / "tiny")
  loading.save_params(directory, params, config.model.to_dict(),
                          tokenizer_dir=os.path.join(demo_world, "tokenizer"))
  return directory


@pytest.fixture(scope="module")
def server(model_dir, demo_world):
  """(base URL, served model, engine) of a server in this process, on a free port."""
  served = engine_lib.load_model(model_dir, template="train", default_max_tokens=MAX_TOKENS)
  engine = engine_lib.Engine(served, 16)
  httpd = http_api.Server(("127.0.0.1", 0), served, engine,
                          limits=Limits(max_image_bytes=2**20, max_image_pixels=10**6),
                          image_root=os.path.join(demo_world, "images"))
  thread = httpd.serve_in_thread()
  yield f"http://127.0.0.1:{httpd.server_address[1]}", served, engine
  httpd.shutdown()
  httpd.server_close()
  thread.join()
  engine.close()


def _post(base: str, payload, timeout: float = 120) -> tuple[int, bytes]:
  body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
  request = urllib.request.Request(f"{base}/v1/chat/completions", data=body,
                                   headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      return response.status, response.read()
  except urllib.error.HTTPError as e:
    return e.code, e.read()


def _ask(question: str, image_url: str, **settings) -> dict:
  return {"model": "tiny", "max_tokens": MAX_TOKENS, **settings,
          "messages": [{"role": "user", "content": [
              {"type": "text", "text": question},
              {"type": "image_url", "image_url": {"url": image_url}}]}]}


def _answer(base: str, payload) -> str:
  status, body = _post(base, payload)
  assert status == 200, body
  return json.loads(body)["choices"][0]["message"]["content"]


def _data_url(path: str) -> str:
  with open(path, "rb") as f:
    return "data:application/octet-stream;base64," + base64.b64encode(f.read()).decode()


def _images(demo_world: str) -> list[str]:
  return sorted(os.listdir(os.path.join(demo_world, "images")))


def test_chat_prompt_of_one_question_is_build_prompt():
  for template in prompts.CHAT_TEMPLATES:
    assert (prompts.chat_prompt((Turn("human", "What is shown?\n<image>"),), template, 4)
            == prompts.build_prompt("What is shown?\n<image>", template, 4))
  two = prompts.chat_prompt((Turn("human", "Q1\n<image>"), Turn("gpt", "A1"),
                             Turn("human", "Q2")), "simple", 2, system="S")
  assert two == ("S###Human: Hi!###Assistant: Hi there!  How can I help you today?\n"
                 "###Human: Q1\n<im_start><im_patch><im_patch><im_end>###Assistant: A1"
                 "###Human: Q2###")


def test_same_answer_as_predict_and_streaming_concatenates(server, demo_world):
  base, served, _ = server
  image = os.path.join(demo_world, "images", "CT_small.dcm")
  question = "Which organ is shown?"
  expected = single_question.answer_question(
      served.model, served.params, served.tokenizer, image, question, template="train",
      max_new_tokens=MAX_TOKENS)
  assert _answer(base, _ask(question, "CT_small.dcm")) == expected  # path under --image_root
  assert _answer(base, _ask(question, _data_url(image))) == expected  # DICOM as a data: URL
  status, body = _post(base, _ask(question, "CT_small.dcm", stream=True))
  assert status == 200
  events = [line[len("data: "):] for line in body.decode().split("\n\n") if line]
  assert events[-1] == "[DONE]"
  chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
  assert "".join(c["delta"].get("content", "") for c in chunks) == expected
  assert chunks[-1]["finish_reason"] in ("stop", "length")
  assert len(_stream_pieces(base, _ask(question, "CT_small.dcm"))) > 1  # not one final blob


def _stream_pieces(base: str, payload: dict) -> list[str]:
  """The content pieces of a streamed answer."""
  status, body = _post(base, {**payload, "stream": True})
  assert status == 200, body
  events = [line[len("data: "):] for line in body.decode().split("\n\n") if line]
  return [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]
          if json.loads(e)["choices"][0]["delta"].get("content")]


def _job(served: engine_lib.ServedModel, image: str, question: str, max_tokens: int
         ) -> engine_lib.Job:
  with open(image, "rb") as f:
    request = Conversation(f.read()).request(question, max_tokens=max_tokens)
  return engine_lib.prepare(request, served, Limits())


def _predict(served: engine_lib.ServedModel, image: str, question: str, max_tokens: int
             ) -> str:
  return single_question.answer_question(served.model, served.params, served.tokenizer, image,
                                         question, template="train", max_new_tokens=max_tokens)


def test_stream_sends_each_piece_during_generation(server, demo_world):
  """Driven by hand, step by step: the first piece is there after the first step while the
  answer is still being generated; every piece is sent at the step that settled it."""
  _, served, _ = server
  image = os.path.join(demo_world, "images", "CT_small.dcm")
  engine = engine_lib.Engine(served, 4, start=False)
  stream = engine.submit(_job(served, image, "Which organ is shown?", MAX_TOKENS))
  pieces = stream.chunks(timeout=60)
  engine.run_once()  # admits (prefill: token 1) and decodes token 2
  first = next(pieces)
  assert not stream.done and first.tokens <= 2
  while not stream.done:
    engine.run_once()
  chunks = [first, *pieces]
  completion = stream.result()
  assert "".join(c.text for c in chunks) == completion.text == _predict(
      served, image, "Which organ is shown?", MAX_TOKENS)
  sent_at = [c.tokens for c in chunks]
  assert len(chunks) > 1 and sent_at == sorted(set(sent_at))
  assert sent_at[0] < completion.completion_tokens


def test_streamed_pieces_ready_at_once_share_a_write_and_a_failure_comes_after_them():
  """Stream.batches groups the pieces there at once (the HTTP layer writes each group at
  once), says when the answer is complete, and hands out what came before a failure
  before raising it; stream_events sends the last group with the finish reason."""
  def whole():
    stream = engine_lib.Stream()
    stream._put(engine_lib.Chunk("liv", 1))
    stream._put(engine_lib.Chunk("er", 2))
    stream._finish(engine_lib.Completion("liver", "stop", 5, 2))
    return stream

  assert [([c.text for c in pieces], final) for pieces, final in whole().batches(1)] == [
      (["liv", "er"], True)]
  [(events, final)] = list(http_api.stream_events(whole(), "m", "id", 0, 1,
                                                  include_usage=True))
  assert final and [e["choices"][0]["delta"] for e in events[:3]] == [
      {"role": "assistant", "content": ""}, {"content": "liv"}, {"content": "er"}]
  assert events[3]["choices"][0]["finish_reason"] == "stop"
  assert events[4]["usage"]["completion_tokens"] == 2

  failing = engine_lib.Stream()
  failing._put(engine_lib.Chunk("a", 1))
  batches = http_api.stream_events(failing, "m", "id", 0, 1)
  events, final = next(batches)
  assert not final and [e["choices"][0]["delta"] for e in events] == [
      {"role": "assistant", "content": ""}, {"content": "a"}]
  failing._put(engine_lib.Chunk("b", 2))
  failing._finish(None, RuntimeError("device lost"))
  events, final = next(batches)
  assert not final and [e["choices"][0]["delta"] for e in events] == [{"content": "b"}]
  with pytest.raises(RuntimeError, match="device lost"):
    next(batches)


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_a_request_joins_a_running_batch_at_the_next_step(server, demo_world, decode_steps):
  """A short request submitted while a long one decodes joins at the next step (the next
  call of `decode_steps` steps), finishes first, and both answers are predict's (prompts
  of different lengths in one batch)."""
  _, served, _ = server
  ct, mr = (os.path.join(demo_world, "images", n) for n in ("CT_small.dcm", "MR_small.dcm"))
  long_question, short_question = "Describe this image in detail.", "Which organ?"
  engine = engine_lib.Engine(served, 4, decode_steps=decode_steps, start=False)
  long = engine.submit(_job(served, ct, long_question, 24))
  for _ in range(3):
    engine.run_once()
  short = engine.submit(_job(served, mr, short_question, 4))
  engine.run_once()
  assert engine.stats.joined_running == 1
  while not short.done:
    engine.run_once()
  assert not long.done  # the short one left the batch first
  while not long.done:
    engine.run_once()
  assert short.result().text == _predict(served, mr, short_question, 4)
  assert long.result().text == _predict(served, ct, long_question, 24)
  assert long.result().completion_tokens == 24  # prefill's token + 23 steps
  assert engine.stats.steps == -(-23 // decode_steps) * decode_steps


def test_decode_calls_take_half_the_steps_while_answers_are_short(server, demo_world):
  """After 8 answers that the prefill's token and a short call hold, calls run half the
  steps (and the answers are still predict's); before, and after warm-up, full calls."""
  _, served, _ = server
  image = os.path.join(demo_world, "images", "CT_small.dcm")
  engine = engine_lib.Engine(served, 4, decode_steps=4, start=False)
  assert slots.step_counts(4) == (2, 4) and engine._steps_per_call() == 4
  short = [engine.submit(_job(served, image, "Which organ is shown?", 3)) for _ in range(8)]
  while not all(stream.done for stream in short):
    engine.run_once()
  assert engine._steps_per_call() == 2
  steps = engine.stats.steps
  longer = engine.submit(_job(served, image, "Which organ is shown?", 7))
  engine.run_once()  # admitted, and its first call dispatched
  assert engine.stats.steps - steps == 2
  while not longer.done:
    engine.run_once()
  assert longer.result().text == _predict(served, image, "Which organ is shown?", 7)
  assert short[0].result().text == _predict(served, image, "Which organ is shown?", 3)


def test_an_idle_engine_waits_for_arriving_requests_and_for_no_one_else(server, demo_world):
  """With nothing decoding, a request on its way (`Engine.arriving`: the HTTP layer is
  preparing it) is admitted in the same round as the one already submitted (prefilled with
  it); a lone request is admitted without waiting. The last round's wall time, which
  bounds the wait, is made an hour, so that a wait for the bound would hang the test
  instead of passing it."""
  _, served, _ = server
  image = os.path.join(demo_world, "images", "CT_small.dcm")
  engine = engine_lib.Engine(served, 4, start=False)
  engine._step_s = 3600.0

  def one_round() -> None:
    worker = threading.Thread(target=engine.run_once, kwargs={"block": True}, daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "the engine waited for a request that was not coming"

  first = engine.submit(_job(served, image, "Which organ is shown?", 2))
  on_its_way = threading.Event()

  def arrive() -> None:
    with engine.arriving():
      on_its_way.set()
      time.sleep(0.5)  # preparing: decoding, tokenizing
      engine.submit(_job(served, image, "Is there a lesion?", 2))

  sender = threading.Thread(target=arrive, daemon=True)
  sender.start()
  on_its_way.wait()
  one_round()
  assert engine.stats.prefill_requests == 2
  while not first.done:
    engine.run_once()
  sender.join()
  alone = engine.submit(_job(served, image, "Which organ is shown?", 2))
  one_round()
  assert engine.stats.prefill_requests == 3
  while not alone.done:
    engine.run_once()
  assert alone.result().text == first.result().text


def test_sixteen_concurrent_clients_are_batched_and_correct(server, demo_world):
  base, _, engine = server
  names = [n for n in _images(demo_world) if n.endswith((".png", ".jpg"))][:16]
  payloads = [_ask(f"Question {i}: what is in this image?", name)
              for i, name in enumerate(names)]
  alone = [_answer(base, p) for p in payloads]
  steps, row_steps = engine.stats.steps, engine.stats.row_steps
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    together = list(pool.map(lambda p: _answer(base, p), payloads))
  assert together == alone and len(set(alone)) > 1, alone
  assert engine.stats.row_steps - row_steps > engine.stats.steps - steps  # > 1 row per step


def test_prefill_chunks_waste_little_padding():
  """Hand-worked: with prefills of 1, 4 or 16 requests, n waiting requests are split so
  that padding wastes at most a quarter of a call."""
  buckets = slots.row_buckets(16, base=4)
  assert buckets == (1, 4, 16) and slots.row_buckets(16) == (1, 2, 4, 8, 16)
  assert slots.row_buckets(6) == (1, 2, 4, 6)
  expected = {1: [1], 2: [1, 1], 3: [3], 5: [4, 1], 7: [4, 3], 11: [4, 4, 3], 12: [12],
              16: [16], 20: [16, 4]}
  assert {n: slots.chunks(n, buckets) for n in expected} == expected
  assert slots.prompt_buckets(256) == (64, 128, 256) and slots.prompt_buckets(300) == (
      64, 128, 256, 300)


BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # jax's compile event


def test_no_compilation_under_traffic_after_warm_up(model_dir, demo_world):
  """After `warm_up`, a burst of more requests than rows (images and text, prompts of
  different lengths) compiles nothing, counted by jax's compile events (which the
  warm-up itself fires) and by the engine; the answers are predict's."""
  served = engine_lib.load_model(model_dir, template="train", default_max_tokens=MAX_TOKENS,
                                 max_context=128)
  engine = engine_lib.Engine(served, 2)
  compiles = []
  listener = lambda event, duration, **_: compiles.append(event) if event == BACKEND_COMPILE \
      else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    report = engine.warm_up()
    assert report.programs == len(engine.programs.all_shapes()) == len(compiles) > 0
    assert engine.stats.steps == engine.stats.prefills == 0  # its requests are not traffic
    compiles.clear()
    names = [n for n in _images(demo_world) if n.endswith((".png", ".jpg"))][:3]
    questions = ["What is shown?", "Which organ is shown in this image, and on which side?",
                 "Is there a lesion?"]
    jobs = [_job(served, os.path.join(demo_world, "images", name), question, MAX_TOKENS)
            for name, question in zip(names, questions)]
    jobs.append(engine_lib.prepare(Conversation().request("hello"), served, Limits()))
    completions = [stream.result(timeout=120) for stream in map(engine.submit, jobs)]
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
    engine.close()
  assert compiles == [] and engine.stats.compiled_later == 0
  assert completions[1].text == _predict(served, os.path.join(demo_world, "images", names[1]),
                                         questions[1], MAX_TOKENS)


def test_sampling_settings_and_stop(server):
  base, _, _ = server
  sampled = _ask("Describe it.", "CT_small.dcm", temperature=0.9, top_p=0.5)
  assert isinstance(_answer(base, sampled), str)
  greedy = _answer(base, _ask("Describe it.", "CT_small.dcm"))
  words = greedy.split()
  if len(words) > 1:
    cut = _answer(base, _ask("Describe it.", "CT_small.dcm", stop=[words[1]]))
    assert cut == greedy[:greedy.index(words[1])]


def _bad_requests(demo_world: str) -> list[tuple[str, object, int, str]]:
  big = "data:image/png;base64," + base64.b64encode(b"\0" * (2**20 + 10)).decode()
  huge_png = base64.b64encode(_png(2000, 1000)).decode()
  text_only = {"role": "user", "content": "hello"}
  return [
      ("malformed json", b"{not json", 400, "malformed_json"),
      ("not an object", b"[1, 2]", 400, "malformed_json"),
      ("no messages", {"model": "tiny"}, 400, "invalid_request"),
      ("bad role", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_request"),
      ("bad temperature", {"messages": [text_only], "temperature": "hot"}, 400,
       "invalid_request"),
      ("image does not decode",
       _ask("q", "data:image/png;base64," + base64.b64encode(b"not an image").decode()),
       400, "invalid_image"),
      ("image too many bytes", _ask("q", big), 413, "image_too_large"),
      ("image too many pixels", _ask("q", "data:image/png;base64," + huge_png), 413,
       "image_too_large"),
      ("two images", {"messages": [{"role": "user", "content": [
          {"type": "image_url", "image_url": {"url": "CT_small.dcm"}},
          {"type": "image_url", "image_url": {"url": "MR_small.dcm"}}]}]}, 400,
       "too_many_images"),
      ("path outside the root", _ask("q", "../tokenizer/tokenizer.json"), 403,
       "image_path_refused"),
      ("absolute path outside the root", _ask("q", "file:///etc/passwd"), 403,
       "image_path_refused"),
      ("missing file", _ask("q", "nothing_here.png"), 400, "image_not_found"),
      ("remote url", _ask("q", "http://example.com/x.png"), 400, "remote_image_refused"),
      ("over the context", {"messages": [{"role": "user", "content": "word " * 1100}]}, 400,
       "context_length_exceeded"),
      ("max_tokens over the context", {"messages": [text_only], "max_tokens": 5000}, 400,
       "context_length_exceeded"),
  ]


def _png(width: int, height: int) -> bytes:
  out = io.BytesIO()
  PIL.Image.new("L", (width, height)).save(out, format="PNG")
  return out.getvalue()


def test_bad_inputs_get_their_4xx_and_the_server_keeps_serving(server, demo_world):
  base, _, _ = server
  for name, payload, status, code in _bad_requests(demo_world):
    got, body = _post(base, payload)
    error = json.loads(body)["error"]
    assert (got, error["code"]) == (status, code), (name, error)
    assert error["message"], name
  assert _answer(base, _ask("Which organ?", "CT_small.dcm")) is not None
  for path, status in (("/health", 200), ("/v1/models", 200), ("/nothing", 404)):
    try:
      with urllib.request.urlopen(base + path, timeout=10) as response:
        got, body = response.status, response.read()
    except urllib.error.HTTPError as e:
      got, body = e.code, e.read()
    assert got == status, path
  with urllib.request.urlopen(base + "/v1/models", timeout=10) as response:
    assert json.loads(response.read())["data"][0]["id"] == "tiny"


def test_multi_turn_text_only_and_the_page(server):
  base, _, _ = server
  conversation = {"messages": [
      {"role": "system", "content": "You are terse."},
      {"role": "user", "content": [{"type": "text", "text": "What is shown?"},
                                   {"type": "image_url", "image_url": {"url": "MR_small.dcm"}}]},
      {"role": "assistant", "content": "A scan."},
      {"role": "user", "content": "Which side?"}], "max_tokens": MAX_TOKENS}
  assert isinstance(_answer(base, conversation), str)
  assert isinstance(_answer(base, {"messages": [{"role": "user", "content": "hi"}]}), str)
  with urllib.request.urlopen(base + "/", timeout=10) as response:
    page = response.read().decode()
  assert "/v1/chat/completions" in page
  assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page)  # nothing from a CDN


def test_judge_client_runs_against_the_server(server, tmp_path):
  base, served, _ = server
  client = chat_client.ChatClient(url=f"{base}/v1", model=served.name, attempts=1)
  messages = [{"role": "user", "content": "Rate the two answers."}]
  assert client.complete(messages) == _answer(base, {"messages": messages})
  questions = [{"question_id": "q1", "text": "What is shown?", "domain": "ct_scan"}]
  summary = judge.review_all(questions, {"q1": "a liver"}, {"q1": "a kidney"}, client,
                             str(tmp_path / "reviews.jsonl"), parse_attempts=1)
  # A random model writes no scores: the judge protocol ran end to end and says so.
  assert summary.get("overall") or "first line" in summary["failed"][0]["error"]


def test_terminal_chat_answers_like_predict_and_keeps_the_conversation(server, model_dir,
                                                                       demo_world):
  _, served, _ = server
  image = os.path.join(demo_world, "images", "CT_small.dcm")
  expected = single_question.answer_question(
      served.model, served.params, served.tokenizer, image, "Which organ is shown?",
      template="train", max_new_tokens=MAX_TOKENS)
  session = "Which organ is shown?\n/bogus\nAnd the side?\n/reset\nWhich organ is shown?\n"
  result = subprocess.run(
      [sys.executable, "-m", "exgra_jax.chat", f"--model={model_dir}", f"--image={image}",
       "--template=train", f"--max_tokens={MAX_TOKENS}"],
      input=session, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  compiled, *lines = result.stdout.split("\n")  # warmed up before the first question
  assert re.match(r"compiled \d+ programs in [\d.]+ s \(context \d+\)", compiled), compiled
  assert lines[1] == expected and lines[2].startswith("unknown command /bogus")
  assert lines[4] == "(new conversation)" and lines[5] == expected
  conversation = Conversation(b"image")
  first = conversation.request("Q1")
  conversation.record(first, "A1")
  assert conversation.request("Q2").turns == (Turn("human", "Q1\n<image>"), Turn("gpt", "A1"),
                                              Turn("human", "Q2"))


def browser_session(base: str, image: str, questions: list[str], screenshot: str,
                    user_data_dir: str) -> list[tuple[str, int]]:
  """Headless Chromium on the chat page: choose `image`, ask each question, wait for each
  streamed answer; -> [(answer text, chunks received)]; the page saved to `screenshot`."""
  from selenium import webdriver  # pylint: disable=g-import-not-at-top (browser test only)
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top
  options = webdriver.ChromeOptions()
  for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--window-size=1000,800",
               f"--user-data-dir={user_data_dir}"):
    options.add_argument(flag)
  options.binary_location = shutil.which("chromium") or ""
  service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
  driver = webdriver.Chrome(options=options, service=service)
  try:
    driver.set_page_load_timeout(30)
    driver.get(base + "/")
    driver.find_element(By.ID, "file").send_keys(image)
    wait = WebDriverWait(driver, 120)
    wait.until(lambda d: os.path.basename(image) in d.find_element(By.ID, "imageName").text)
    answers = []
    for turn, question in enumerate(questions):
      driver.find_element(By.ID, "question").send_keys(question)
      driver.find_element(By.ID, "send").click()
      wait.until(lambda d, n=turn + 1: len(d.find_elements(
          By.CSS_SELECTOR, ".msg.assistant[data-done='true']")) == n
                 or d.find_elements(By.CSS_SELECTOR, ".msg.error"))
      assert not driver.find_elements(By.CSS_SELECTOR, ".msg.error"), driver.find_element(
          By.CSS_SELECTOR, ".msg.error").text
      out = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
      answers.append((out.text, int(out.get_attribute("data-chunks") or 0)))
    driver.save_screenshot(screenshot)
    return answers
  finally:
    driver.quit()


def test_the_page_in_a_real_browser(server, demo_world, tmp_path):
  """Upload a demo image, ask, see the answer stream in, ask again (Debian's chromium and
  chromium-driver, installed by the README's test command). SERVE_SCREENSHOT=PATH keeps
  the screenshot (docs/serve.png is made so)."""
  base, _, _ = server
  assert shutil.which("chromedriver") and shutil.which("chromium"), (
      "the browser test needs Debian's chromium and chromium-driver (apt-get install -y "
      "chromium chromium-driver; the README's test command installs them)")
  name = next(n for n in _images(demo_world) if n.endswith(".png"))
  image = os.path.join(demo_world, "images", name)
  screenshot = os.environ.get("SERVE_SCREENSHOT") or str(tmp_path / "serve.png")
  answers = browser_session(base, image, ["What is shown in this image?", "Anything else?"],
                            screenshot, str(tmp_path / "chromium"))
  pieces = _stream_pieces(base, _ask("What is shown in this image?", name))
  assert answers[0] == ("".join(pieces), len(pieces))
  assert len(answers) == 2 and os.path.getsize(screenshot) > 0


def test_serve_command_line(model_dir, demo_world):
  """The real entry point: binds 127.0.0.1, says where, answers; bad flags exit 2."""
  command = [sys.executable, "-m", "exgra_jax.serve", f"--model={model_dir}", "--port=0",
             "--template=train", f"--image_root={os.path.join(demo_world, 'images')}"]
  bad = subprocess.run(command + ["--max_batch=0"], cwd=REPO, capture_output=True, text=True,
                       timeout=120, check=False)
  assert bad.returncode == 2 and "--max_batch=0 must be >= 1" in bad.stderr
  process = subprocess.Popen(command + ["--max_batch=1", "--max_context=256"], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  try:
    compiled = process.stdout.readline()
    assert re.match(r"compiled \d+ programs in [\d.]+ s \(context 256\)", compiled), compiled
    base = re.search(r"http://127\.0\.0\.1:\d+", process.stdout.readline()).group(0)
    assert _answer(base, _ask("Which organ?", "CT_small.dcm")) is not None
  finally:
    process.terminate()
    process.wait(timeout=60)


def test_serves_a_hugging_face_export_like_its_checkpoint(server, model_dir, demo_world,
                                                          tmp_path):
  base, _, _ = server
  loaded = loading.load(model_dir)
  exporter.export(loaded.params, loaded.model_config, str(tmp_path / "hf"),
                  tokenizer_dir=loaded.tokenizer_dir)
  served = engine_lib.load_model(str(tmp_path / "hf"), template="train")
  engine = engine_lib.Engine(served, 1)
  try:
    job = _job(served, os.path.join(demo_world, "images", "MR_small.dcm"), "Which organ?",
               MAX_TOKENS)
    completion = engine.submit(job).result(timeout=120)
  finally:
    engine.close()
  assert completion.text == _answer(base, _ask("Which organ?", "MR_small.dcm"))
