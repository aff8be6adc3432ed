# Quick start: `make pretrain` runs the demo job, `make test` the test suite.
# Both create .venv on first use (see launchers/env.sh) and reuse it afterwards.
.PHONY: setup pretrain test

setup:
	bash launchers/env.sh setup

pretrain:
	bash launchers/env.sh pretrain $(ARGS)

test:
	bash launchers/env.sh test $(ARGS)
