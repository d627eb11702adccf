"""`epic-rag serve`: the OpenAI-compatible HTTP server over an index, with a web chat page.

- `api_server`: the FastAPI app (routes, API key, error bodies) and the bind check;
- `protocol`: the OpenAI request and response schemas (pydantic), `APIError`;
- `serving_chat`: the /v1/chat/completions handler (limits, whole and streamed answers);
- `metrics`: the Prometheus metrics;
- `worker`: the bounded queue that runs one request at a time;
- `process`: `epic-rag serve` as a child process (benchmarks, tests);
- `cli`: the `serve` subcommand; `web/`: the chat page.
"""
