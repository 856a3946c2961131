"""The catalogue of services a configuration can pick, each a Jinja2 template with options."""
