"""Stubs generated from proto/sluice/v1/broker.proto when the package is built."""
