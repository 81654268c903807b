"""duplexgate gateway: telephony media streams in, full-duplex agent audio out."""
