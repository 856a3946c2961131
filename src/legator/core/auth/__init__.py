"""Identity shared by every wing: users, roles, permissions, API keys and sessions."""
