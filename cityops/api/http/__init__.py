"""HTTP plumbing shared by every API domain: auth, problems, parameters, responses, cache."""
