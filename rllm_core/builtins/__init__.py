"""Built-in plugins, registered through the same pluggy path as third-party ones."""
