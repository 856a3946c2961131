"""HTTP plumbing shared by every wing: app factory, middleware, errors, auth dependencies."""
