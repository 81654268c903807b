"""The edge: what faces the carriers. The FastAPI app and its routes, the media-stream bridge, the calls the
voice webhook prepares, and one transport per carrier dialect (wire format, signatures, call control)."""
