"""TEST DOUBLE of pycuda (see ../README.md): never installed, only put on sys.path by tests."""
