"""The event-loop side, all that knows a socket or HTTP: app, session, connection, transport, metrics, the page."""
