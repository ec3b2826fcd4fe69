# `make test`, `make book` and `make lab` create .venv on first use and install the package with
# its extras (dev: tests and lint; cluster: Ray); `make lab` adds JupyterLab with the ipywidgets
# extension (extra `lab`) the first time it runs, since nothing else needs it.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROFILE ?= smoke
JOBS ?= 2
LAB_ARGS ?=

.PHONY: venv test test-fast lint browser book book-assets bench lab doctor rehearsal clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# A current pip resolves this install in 1 m 45 s here; the venv's bundled one took ~3 min.
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev,cluster]"
	# Only for its CLIP BPE vocabulary (the rehearsal's real tokenizer): no dependencies.
	$(BIN)/python -m pip install -q --no-deps "open_clip_torch>=2.20"
	touch $@

venv: $(BIN)/.installed

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint browser
	$(BIN)/python -m pytest -q --durations=12

# The inner loop: every test but the end-to-end ones marked slow (book builds, kill/resume,
# the full-size rehearsal, the Ray cluster).
test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow"

# The browser check of the built book (tests/test_book_browser.py) opens it in headless Chromium:
# Debian's package, installed here when it is missing and apt-get can run (as root or through
# passwordless sudo). Where no browser can be had the check skips and says why; CHROMIUM=/path
# picks another Chromium or Chrome.
browser:
	@if [ -n "$$CHROMIUM" ] || command -v chromium >/dev/null 2>&1; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "note: no chromium and no apt-get: the browser check of the book will skip"; \
	else \
		SUDO=; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
		echo "installing chromium (Debian package) for the browser check of the book"; \
		{ $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq chromium >/dev/null; } || \
		echo "note: apt-get could not install chromium: the browser check of the book will skip"; \
	fi

# Browser assets the book serves itself (no CDN): require.js, the ipywidgets embedder and its
# Font Awesome files, MathJax. Pinned in package.json / package-lock.json and copied from
# node_modules into book/_static/npm/; book/_static/widgets-requirejs-config.js says why the
# fonts are copied twice.
NPM_STATIC := book/_static/npm
WIDGETS := $(NPM_STATIC)/@jupyter-widgets
HTML_MANAGER := node_modules/@jupyter-widgets/html-manager/dist
MATHJAX := node_modules/mathjax/es5

$(NPM_STATIC)/.copied: package.json package-lock.json
	npm ci --ignore-scripts --no-audit --no-fund
	rm -rf $(NPM_STATIC)
	mkdir -p $(WIDGETS)/html-manager/dist $(NPM_STATIC)/mathjax/output/chtml/fonts \
		$(NPM_STATIC)/mathjax/input/tex
	cp node_modules/requirejs/require.js $(NPM_STATIC)/
	cp $(HTML_MANAGER)/embed-amd.js $(WIDGETS)/html-manager/dist/
	for dir in $(WIDGETS) $(WIDGETS)/html-manager/dist; do \
		cp $(HTML_MANAGER)/*.woff2 $(HTML_MANAGER)/*.woff $(HTML_MANAGER)/*.ttf \
			$(HTML_MANAGER)/*.eot $(HTML_MANAGER)/*.svg $$dir/ || exit 1; \
	done
	cp $(MATHJAX)/tex-mml-chtml.js $(NPM_STATIC)/mathjax/
	cp -r $(MATHJAX)/ui $(MATHJAX)/a11y $(NPM_STATIC)/mathjax/
	cp -r $(MATHJAX)/input/tex/extensions $(NPM_STATIC)/mathjax/input/tex/
	cp -r $(MATHJAX)/output/chtml/fonts/woff-v2 $(NPM_STATIC)/mathjax/output/chtml/fonts/
	touch $@

book-assets: $(NPM_STATIC)/.copied

# The preflight: model, datasets, GPU, disk and outputs of a profile, one line each (smoke: 0.3 s).
doctor: venv
	$(BIN)/python -m collapse_utils doctor --profile $(PROFILE) --jobs $(JOBS)

book: venv book-assets doctor
	$(BIN)/python -m collapse_utils run --profile $(PROFILE) --jobs $(JOBS)

# The full profile's code path on full-size fixtures (random ViT-B/32, fake data in the real
# formats), a few steps per configuration, ending with doctor passing and the book building.
rehearsal: venv book-assets
	$(BIN)/python -m collapse_utils rehearse --jobs $(JOBS)

bench: venv
	$(BIN)/python bench.py

# The exploration notebook in JupyterLab, served from the repository root; it reads the runs of
# `make book`. On a remote box: make lab LAB_ARGS="--no-browser --port 8888" and forward the port.
$(BIN)/.lab-installed: $(BIN)/.installed
	$(BIN)/python -m pip install -q -e ".[lab]"
	touch $@

lab: $(BIN)/.lab-installed
	$(BIN)/jupyter lab --ServerApp.root_dir=$(CURDIR) $(LAB_ARGS) notebooks/09_explore.ipynb

clean:
	rm -rf _build book/executed _toc.yml outputs/smoke
