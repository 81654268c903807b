"""Engine workers in their own processes (one per GPU) and the client gateways reach them through.

`registry.py`: workers announce themselves and their free slots in Redis. `protocol.py`: what crosses the
wire between a gateway and a worker. `server.py`: the worker's HTTP/WebSocket app around an EngineWorker.
`client.py`: `RemoteEngine`, the gateway's side, which implements engine.api's Engine and EngineSession
and moves a call to another worker when its worker dies.
"""
