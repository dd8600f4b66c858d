pytest_plugins = ["testbed.fixtures", "testbed.real_model"]  # real_model: the smollm2 fixture
