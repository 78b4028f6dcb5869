"""Plain functions and data that build what tests run on, shared by several test modules.

Fixtures live in tests/conftest.py; what is here is called with arguments (a folder, a text list, a
step count) or imported by the scripts that tests run in subprocesses, where fixtures do not reach.
No test module imports another test module (tests/test_layers.py checks it).
"""
