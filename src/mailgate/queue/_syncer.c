/* The queue's sync thread (queue/store.py, "commits on the event loop"): a thread that fdatasyncs the file
 * descriptors it is given and then writes to an eventfd that the event loop reads. It never takes the GIL,
 * which is why it is C: a Python thread must take the GIL back after each sync before it can say it is done,
 * and under load that wait (up to the interpreter's 5 ms switch interval) was the largest part of an accepted
 * message's latency (bench/README.md, ninth round).
 *
 * One batch at a time: sync(fds) hands a batch over, take() collects its result once it is done (the errno of
 * the first failed sync, or 0) and returns None before, wait() blocks until it is done. The caller keeps the
 * descriptors open until it has collected the result. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <unistd.h>

enum { IDLE, SUBMITTED, DONE };

typedef struct {
    PyObject_HEAD
    pthread_t thread;
    pthread_mutex_t mutex;
    pthread_cond_t changed;
    int started;
    int stop;
    int state;
    int error;
    int eventfd;
    int *fds;
    Py_ssize_t nfds;
} Syncer;

static void *
syncer_main(void *arg)
{
    Syncer *self = arg;
    pthread_mutex_lock(&self->mutex);
    for (;;) {
        while (self->state != SUBMITTED && !self->stop)
            pthread_cond_wait(&self->changed, &self->mutex);
        if (self->state != SUBMITTED)   /* stopping, nothing handed over */
            break;
        pthread_mutex_unlock(&self->mutex);
        int error = 0;
        for (Py_ssize_t i = 0; i < self->nfds && !error; i++)
            if (fdatasync(self->fds[i]) != 0)
                error = errno;
        pthread_mutex_lock(&self->mutex);
        self->error = error;
        self->state = DONE;
        pthread_cond_broadcast(&self->changed);
        uint64_t one = 1;
        ssize_t written;
        do
            written = write(self->eventfd, &one, sizeof one);
        while (written < 0 && errno == EINTR);
    }
    pthread_mutex_unlock(&self->mutex);
    return NULL;
}

static int
syncer_init(Syncer *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"eventfd", NULL};
    int eventfd;
    if (self->started) {
        PyErr_SetString(PyExc_RuntimeError, "Syncer already started");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "i", keywords, &eventfd))
        return -1;
    self->eventfd = eventfd;
    self->state = IDLE;
    pthread_mutex_init(&self->mutex, NULL);
    pthread_cond_init(&self->changed, NULL);
    int failed = pthread_create(&self->thread, NULL, syncer_main, self);
    if (failed) {
        errno = failed;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->started = 1;
    return 0;
}

/* sync(fds: sequence of int) -> None: start syncing them (RuntimeError if a batch is still uncollected). */
static PyObject *
syncer_sync(Syncer *self, PyObject *arg)
{
    if (!self->started || self->stop) {
        PyErr_SetString(PyExc_RuntimeError, "the syncer is closed");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(arg, "sync() expects a sequence of file descriptors");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    int *fds = PyMem_RawMalloc(sizeof(int) * (n ? n : 1));
    if (fds == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long fd = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if ((fd == -1 && PyErr_Occurred()) || fd < 0 || fd > INT_MAX) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "not a file descriptor");
            PyMem_RawFree(fds);
            Py_DECREF(seq);
            return NULL;
        }
        fds[i] = (int)fd;
    }
    Py_DECREF(seq);
    pthread_mutex_lock(&self->mutex);
    if (self->state != IDLE) {
        pthread_mutex_unlock(&self->mutex);
        PyMem_RawFree(fds);
        PyErr_SetString(PyExc_RuntimeError, "a batch is still being synced or uncollected");
        return NULL;
    }
    PyMem_RawFree(self->fds);
    self->fds = fds;
    self->nfds = n;
    self->state = SUBMITTED;
    pthread_cond_broadcast(&self->changed);
    pthread_mutex_unlock(&self->mutex);
    Py_RETURN_NONE;
}

/* take() -> int | None: the finished batch's result (0, or the errno of its first failed sync), once. */
static PyObject *
syncer_take(Syncer *self, PyObject *unused)
{
    if (!self->started)
        Py_RETURN_NONE;
    pthread_mutex_lock(&self->mutex);
    int done = self->state == DONE, error = self->error;
    if (done)
        self->state = IDLE;
    pthread_mutex_unlock(&self->mutex);
    if (!done)
        Py_RETURN_NONE;
    return PyLong_FromLong(error);
}

/* wait() -> None: block, without the GIL, until no batch is being synced. */
static PyObject *
syncer_wait(Syncer *self, PyObject *unused)
{
    if (!self->started)
        Py_RETURN_NONE;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->mutex);
    while (self->state == SUBMITTED)
        pthread_cond_wait(&self->changed, &self->mutex);
    pthread_mutex_unlock(&self->mutex);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static void
syncer_stop(Syncer *self)
{
    if (!self->started || self->stop)
        return;
    pthread_mutex_lock(&self->mutex);
    self->stop = 1;
    pthread_cond_broadcast(&self->changed);
    pthread_mutex_unlock(&self->mutex);
    pthread_join(self->thread, NULL);   /* it finishes the batch in hand first */
}

/* close() -> None: finish the batch in hand, stop the thread. The result of that batch can still be taken. */
static PyObject *
syncer_close(Syncer *self, PyObject *unused)
{
    Py_BEGIN_ALLOW_THREADS
    syncer_stop(self);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static void
syncer_dealloc(Syncer *self)
{
    Py_BEGIN_ALLOW_THREADS
    syncer_stop(self);
    Py_END_ALLOW_THREADS
    if (self->started) {
        pthread_mutex_destroy(&self->mutex);
        pthread_cond_destroy(&self->changed);
    }
    PyMem_RawFree(self->fds);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef syncer_methods[] = {
    {"sync", (PyCFunction)syncer_sync, METH_O, "Start syncing a batch of file descriptors."},
    {"take", (PyCFunction)syncer_take, METH_NOARGS, "The finished batch's errno (0: all synced), or None."},
    {"wait", (PyCFunction)syncer_wait, METH_NOARGS, "Block until no batch is being synced."},
    {"close", (PyCFunction)syncer_close, METH_NOARGS, "Finish the batch in hand and stop the thread."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SyncerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mailgate.queue._syncer.Syncer",
    .tp_basicsize = sizeof(Syncer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A thread that syncs file descriptors without the GIL and signals an eventfd after each batch.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)syncer_init,
    .tp_dealloc = (destructor)syncer_dealloc,
    .tp_methods = syncer_methods,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_syncer", NULL, -1, NULL};

PyMODINIT_FUNC
PyInit__syncer(void)
{
    if (PyType_Ready(&SyncerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&SyncerType);
    if (PyModule_AddObject(m, "Syncer", (PyObject *)&SyncerType) < 0) {
        Py_DECREF(&SyncerType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
