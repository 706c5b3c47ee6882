"""Shipped run recipes (YAML files beside this module), each loaded and run at tiny size by the tests."""
