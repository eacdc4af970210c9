pytest_plugins = ["pytest_jupyter.jupyter_server", "rbee_jupyter.testing.pytest_plugin"]
