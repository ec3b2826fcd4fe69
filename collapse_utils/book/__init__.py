"""Book: figures, what each page shows, the widget explorer and the papermill runner."""
