"""Kiln's HTTP server: an OpenAI-compatible API over the model package's engine.

`create_app(engine, settings)` (server.app) builds the FastAPI app; `python -m server` /
`kiln serve` (server.__main__) runs it under uvicorn. See server/app.py for the layout.
"""
