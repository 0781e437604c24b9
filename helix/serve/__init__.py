"""``helix serve``: an OpenAI-compatible completions endpoint over the disaggregated deployment (docs/design.md §5.4).

protocol.py is the request body and the response objects, app.py the FastAPI routes over a running Cluster,
server.py the socket, uvicorn and the lifetime (a failed rank stops the server with the rank's error).
"""
