"""The HTTP service over a Recommender (FastAPI + uvicorn; DESIGN sections 8 and 13)."""
