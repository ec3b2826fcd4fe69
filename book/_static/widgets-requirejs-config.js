// Loaded after require.js and before embed-amd.js (see nb_ipywidgets_js in _config.yml).
// embed-amd.js defines the built-in widget modules (@jupyter-widgets/base, controls, output,
// html-manager) by name, and their CSS loads Font Awesome from the folder of the module's URL.
// RequireJS derives that URL from baseUrl, which is the page's folder unless set, so the fonts
// 404. Here baseUrl is _static/npm/, where `make book-assets` puts the fonts.
require.config({ baseUrl: new URL("npm/", document.currentScript.src).href });
