"""The inference layer: a loaded model answering questions.

Loading a model for answering, the prompts, the pixels of an image file and generation
(`generate.py`, `prompts.py`, `single_question.py`). Below both `eval/` (which adds the
protocols and metrics) and `serving/` (which adds the HTTP server and the chat), above
`weights/`, so that serving never imports an evaluation module to answer.
"""
