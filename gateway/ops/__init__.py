"""Operations: what the business sees and steers. Live calls and call records (memory or Redis), the
recorder that keeps them, the control API, and signed call-event webhooks."""
