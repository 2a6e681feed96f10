"""``seq2seq serve``: a LibreTranslate-compatible HTTP service with dynamic batching.

The modules, in the order a request meets them:

* ``options``: the limits and batching settings (each a ``serve`` flag) and API keys;
* ``parsing``: reading and checking a ``/translate`` body (JSON or form) into a
  ``TranslateRequest``, or an ``ApiError`` with LibreTranslate's status code;
* ``pairs``: the loaded models, one per language pair, and how a text becomes the same lines
  ``seq2seq translate`` would read;
* ``worker``: one decoding thread per model that batches concurrent requests;
* ``metrics``: Prometheus counters and histograms;
* ``app``: the FastAPI routes; ``page``: the HTML page at ``/``;
* ``server``: loads the checkpoints and runs uvicorn.

Nothing here is imported by the other commands: FastAPI loads only for ``seq2seq serve``.
"""
