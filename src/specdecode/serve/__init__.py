"""OpenAI-compatible serving: ``specdecode serve`` (see docs/serving.md).

Needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client); Ray Serve needs ``ray``.
"""
