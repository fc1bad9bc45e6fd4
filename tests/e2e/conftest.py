from tests.service.conftest import fresh_index, served

__all__ = ["fresh_index", "served"]
