"""Gallery -> index artefact (FAISS, part-grid store, item table, manifest). Depends on model/."""

__all__: list[str] = []
