"""HTML of the gateway's server-rendered pages."""
