"""Serving: the continuous-batching engine (engine.py: slots, prefill, the batched decode step, no HTTP), the
OpenAI-compatible API on top of it (api.py: typed requests; textstream.py: tokens to text and stop strings;
server.py: the handlers and the playground page; http.py: the listener's limits). Only jaxgpt's model and
sampling are below it; `pip install 'jaxgpt[serve]'` brings what it needs."""
