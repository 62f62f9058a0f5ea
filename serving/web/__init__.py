"""The pages the service serves: plain HTML, CSS and JavaScript, no build step and no CDN.

`*.html` are the pages (`serving/routes/pages.py` serves them after a role check); `static/` holds
their styles and scripts, mounted at `/static`.
"""
