"""The call room: one CallSession per phone call between the edge (CallEvents) and the engine
(EngineSession), with its limits, escalation and the notices it raises. Knows no carrier and no tensor."""
