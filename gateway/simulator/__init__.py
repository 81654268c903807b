"""Simulated carriers that place calls against a gateway over real HTTP and WebSockets, speaking a
carrier's protocol exactly: behind `duplexgate call`, the tests and the load benchmark."""
