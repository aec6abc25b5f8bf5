"""The HTTP service over a Recommender (FastAPI + uvicorn; docs/design.md §8 and §13)."""
