"""The suite runs against a real PostgreSQL through pgaccess's own pytest plugin."""

pytest_plugins = ["pgaccess.testing", "support.fixtures", "support.raw"]
