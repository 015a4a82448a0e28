"""``--serve``: the HTTP API (A1111's ``/sdapi/v1``), on uvicorn or on Ray Serve."""
