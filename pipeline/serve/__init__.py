"""The serve app: an HTTP API and one web page over a QuerySession (FastAPI, run by uvicorn)."""
