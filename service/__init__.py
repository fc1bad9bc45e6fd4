"""The FastAPI service and the ``diml`` command line. Depends on model/ and index_builder/."""

__all__: list[str] = []
