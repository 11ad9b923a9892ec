"""Document ingestion: uploaded files to plain text with sections (parsers), sections to chunks (chunking)."""
