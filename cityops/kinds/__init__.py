"""Device kinds as data: one YAML file per kind, checked and compiled once at start.

`spec` reads and checks one kind file, `readings` compiles a kind into its strict pydantic
model, `catalog` loads a folder of kind files into the set every service works with,
`smart_data_models` checks the Smart Data Model mapping against the models' schemas and
`startup` is what each service calls at start. The shipped kinds are package data in
`shipped/` (`deploy/kinds` links there); docs/kinds.md describes every key.
"""
