"""Manifest loading: YAML with source positions, schema checks, errors at file:line:column."""
