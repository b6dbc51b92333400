"""SQL persistence: typed tables, engine and session management, migrations."""
