"""The fast tier: pure logic, no Redis, no worker, no network (`make test-fast`)."""
