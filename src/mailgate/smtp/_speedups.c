/* Per-byte work of the SMTP message path, one pass in C where Python needs several (bench/README.md).
 * Each function has a pure-Python twin in smtp/bodyscan.py with the same result; the tests run both. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* The bytes of a bytes object as [*start, *end); 0 with TypeError for anything else. */
static int
bytes_range(PyObject *arg, const char *function, const char **start, const char **end)
{
    if (!PyBytes_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "%s() expects bytes", function);
        return 0;
    }
    *start = PyBytes_AS_STRING(arg);
    *end = *start + PyBytes_GET_SIZE(arg);
    return 1;
}

/* unstuff_body(chunk: bytes) -> (bytes, bool)
 * A chunk of DATA as the receiving state machine cuts it (never ending inside "\r\n"): the leading dot of
 * every line after a CRLF removed (RFC 5321 4.5.2), and whether any CR or LF stands outside a CRLF pair. */
static PyObject *
unstuff_body(PyObject *module, PyObject *arg)
{
    const char *start, *end;
    if (!bytes_range(arg, "unstuff_body", &start, &end))
        return NULL;
    Py_ssize_t size = end - start;
    Py_ssize_t lf = 0, crlf = 0, cr = 0, dots = 0;
    for (const char *p = start; p < end && (p = memchr(p, '\n', end - p)) != NULL; p++) {
        lf++;
        if (p > start && p[-1] == '\r') {
            crlf++;
            if (p + 1 < end && p[1] == '.')
                dots++;
        }
    }
    for (const char *p = start; p < end && (p = memchr(p, '\r', end - p)) != NULL; p++)
        cr++;
    int bare = lf != crlf || cr != crlf;
    PyObject *out;
    if (dots == 0) {
        Py_INCREF(arg);
        out = arg;
    } else {
        out = PyBytes_FromStringAndSize(NULL, size - dots);
        if (out == NULL)
            return NULL;
        char *w = PyBytes_AS_STRING(out);
        const char *from = start;
        for (const char *p = start; p < end && (p = memchr(p, '\n', end - p)) != NULL; p++) {
            if (p > start && p[-1] == '\r' && p + 1 < end && p[1] == '.') {
                memcpy(w, from, p + 1 - from);
                w += p + 1 - from;
                from = p + 2;   /* the dot is left out */
                p++;
            }
        }
        memcpy(w, from, end - from);
    }
    return Py_BuildValue("(NO)", out, bare ? Py_True : Py_False);
}

/* stuff_body(content: bytes) -> bytes
 * Content whose lines end in CRLF as a DATA body: every dot that follows a LF doubled (RFC 5321 4.5.2). */
static PyObject *
stuff_body(PyObject *module, PyObject *arg)
{
    const char *start, *end;
    if (!bytes_range(arg, "stuff_body", &start, &end))
        return NULL;
    Py_ssize_t size = end - start;
    Py_ssize_t dots = 0;
    for (const char *p = start; p < end && (p = memchr(p, '\n', end - p)) != NULL; p++)
        if (p + 1 < end && p[1] == '.')
            dots++;
    if (dots == 0) {
        Py_INCREF(arg);
        return arg;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, size + dots);
    if (out == NULL)
        return NULL;
    char *w = PyBytes_AS_STRING(out);
    const char *from = start;
    for (const char *p = start; p < end && (p = memchr(p, '\n', end - p)) != NULL; p++) {
        if (p + 1 < end && p[1] == '.') {
            memcpy(w, from, p + 2 - from);   /* up to and with the dot, */
            w += p + 2 - from;
            *w++ = '.';                       /* then the dot again */
            from = p + 2;
            p++;
        }
    }
    memcpy(w, from, end - from);
    return out;
}

static PyMethodDef methods[] = {
    {"unstuff_body", unstuff_body, METH_O, "A DATA chunk unstuffed, and whether it holds a bare CR or LF."},
    {"stuff_body", stuff_body, METH_O, "Content with CRLF line endings as a DATA body: leading dots doubled."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_speedups", NULL, -1, methods};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module);
}
