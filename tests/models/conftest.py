import pytest

from tests.cpu_threads import single_cpu_thread

one_cpu_thread = pytest.fixture(scope="package", autouse=True)(single_cpu_thread)
