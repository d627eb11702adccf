"""Framework integrations of epic-rag (importable as ``epic_rag.integrations``)."""
