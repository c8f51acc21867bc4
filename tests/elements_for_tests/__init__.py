"""Elements that exist only to exercise the SDK in tests (`python -m tests.elements_for_tests.<name>`)."""
