"""The Jupyter server extension: configuration, thin HTTP handlers and SSE streaming."""
