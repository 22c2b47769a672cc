/*
 * An awaitable whose result is already there, in plain C: awaiting it gives `value` at once.
 * Through am_send (Python 3.10, 3.11) it returns the value with no exception at all; through
 * tp_iternext (3.12+) it sets StopIteration(value). Cython code raising StopIteration would add
 * a traceback entry (a frame) per item. Used by _reader.AsyncStream.__anext__ (the uvloop and
 * asyncpg pattern: only an empty buffer goes through the event loop).
 */
#ifndef PGL_AWAITABLE_H
#define PGL_AWAITABLE_H

#include <Python.h>

typedef struct {
    PyObject_HEAD
    PyObject *value;
} pgl_ReadyObject;

static void pgl_ready_dealloc(PyObject *self) {
    Py_XDECREF(((pgl_ReadyObject *)self)->value);
    PyObject_Free(self);
}

static PyObject *pgl_ready_self(PyObject *self) { Py_INCREF(self); return self; }

static PyObject *pgl_ready_next(PyObject *self) {
    PyObject *value = ((pgl_ReadyObject *)self)->value, *exc;
    ((pgl_ReadyObject *)self)->value = NULL;
    if (value == NULL) {            /* awaited again: None, like a finished coroutine */
        PyErr_SetNone(PyExc_StopIteration);
        return NULL;
    }
    /* StopIteration(value) built here, so that a tuple value is not unpacked */
    exc = PyObject_CallOneArg(PyExc_StopIteration, value);
    Py_DECREF(value);
    if (exc != NULL) {
        PyErr_SetObject(PyExc_StopIteration, exc);
        Py_DECREF(exc);
    }
    return NULL;
}

static PyObject *pgl_ready_send(PyObject *self, PyObject *arg) {
    return pgl_ready_next(self);
}

static PyObject *pgl_ready_throw(PyObject *self, PyObject *args) {
    PyObject *typ, *val = NULL, *tb = NULL;
    Py_CLEAR(((pgl_ReadyObject *)self)->value);
    if (!PyArg_UnpackTuple(args, "throw", 1, 3, &typ, &val, &tb))
        return NULL;
    if (PyExceptionInstance_Check(typ))
        PyErr_SetObject((PyObject *)Py_TYPE(typ), typ);
    else if (val != NULL && val != Py_None)
        PyErr_SetObject(typ, val);
    else
        PyErr_SetNone(typ);
    return NULL;
}

static PyObject *pgl_ready_close(PyObject *self, PyObject *unused) {
    Py_CLEAR(((pgl_ReadyObject *)self)->value);
    Py_RETURN_NONE;
}

#if PY_VERSION_HEX >= 0x030A0000
static PySendResult pgl_ready_am_send(PyObject *self, PyObject *arg, PyObject **result) {
    PyObject *value = ((pgl_ReadyObject *)self)->value;
    ((pgl_ReadyObject *)self)->value = NULL;
    if (value == NULL) {
        Py_INCREF(Py_None);
        value = Py_None;
    }
    *result = value;                /* the reference moves to the caller */
    return PYGEN_RETURN;
}
#endif

static PyAsyncMethods pgl_ready_async = {
    pgl_ready_self,                 /* am_await */
    0, 0,                           /* am_aiter, am_anext */
#if PY_VERSION_HEX >= 0x030A0000
    pgl_ready_am_send,
#endif
};

static PyMethodDef pgl_ready_methods[] = {
    {"send", pgl_ready_send, METH_O, NULL},
    {"throw", pgl_ready_throw, METH_VARARGS, NULL},
    {"close", pgl_ready_close, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject pgl_ReadyType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    "pglistener._reader.Ready",   /* tp_name */
    sizeof(pgl_ReadyObject),        /* tp_basicsize */
};

static int pgl_ready_init(void) {
    pgl_ReadyType.tp_dealloc = pgl_ready_dealloc;
    pgl_ReadyType.tp_as_async = &pgl_ready_async;
    pgl_ReadyType.tp_flags = Py_TPFLAGS_DEFAULT;
    pgl_ReadyType.tp_doc = "An awaitable whose result is already there.";
    pgl_ReadyType.tp_iter = pgl_ready_self;
    pgl_ReadyType.tp_iternext = pgl_ready_next;
    pgl_ReadyType.tp_methods = pgl_ready_methods;
    return PyType_Ready(&pgl_ReadyType);
}

static PyObject *pgl_ready_new(PyObject *value) {
    pgl_ReadyObject *self = PyObject_New(pgl_ReadyObject, &pgl_ReadyType);
    if (self == NULL)
        return NULL;
    Py_INCREF(value);
    self->value = value;
    return (PyObject *)self;
}

#endif
