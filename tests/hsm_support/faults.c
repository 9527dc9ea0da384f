/* A PKCS#11 module for the tests: every call goes to the module named by
 * TSA_TEST_REAL_MODULE (SoftHSM2), except that
 * - C_Sign does not return while the file named by TSA_TEST_STALL_FILE exists (it looks every
 *   10 ms): an HSM that stops answering;
 * - a C_Sign that finds the file named by TSA_TEST_DROP_SESSIONS removes it and first closes
 *   every session of the slot last opened (C_CloseAllSessions, which logs the application
 *   out): an HSM that lost its sessions, as a restarted one does;
 * - each C_Login appends a line to the file named by TSA_TEST_LOGINS;
 * - a C_SignInit that finds the file named by TSA_TEST_LOSE_KEY removes it and answers
 *   CKR_KEY_HANDLE_INVALID: a key handle gone stale;
 * - C_FindObjectsInit answers CKR_FUNCTION_FAILED while the file named by
 *   TSA_TEST_FIND_FAILS exists: a search that fails in the module.
 * cryptoki copies the function list once, at load, so only C_GetFunctionList is exported (no
 * C_GetInterface).
 *
 * No PKCS#11 header is needed: the list is the version and 68 function pointers (PKCS#11 2.40,
 * CK_FUNCTION_LIST), in the standard's order. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define FUNCTIONS 68
#define C_OPEN_SESSION 12
#define C_CLOSE_ALL_SESSIONS 14
#define C_LOGIN 18
#define C_FIND_OBJECTS_INIT 26
#define C_SIGN_INIT 42
#define C_SIGN 43
#define CKR_OK 0UL
#define CKR_GENERAL_ERROR 5UL
#define CKR_FUNCTION_FAILED 6UL
#define CKR_ARGUMENTS_BAD 7UL
#define CKR_KEY_HANDLE_INVALID 0x60UL

typedef unsigned long ck_ulong;

struct function_list {
    unsigned char version[2];
    void (*functions[FUNCTIONS])(void);
};

typedef ck_ulong (*sign_fn)(ck_ulong session, unsigned char *data, ck_ulong data_len,
                            unsigned char *signature, ck_ulong *signature_len);
typedef ck_ulong (*open_session_fn)(ck_ulong slot, ck_ulong flags, void *application,
                                    void *notify, ck_ulong *session);
typedef ck_ulong (*close_all_sessions_fn)(ck_ulong slot);
typedef ck_ulong (*login_fn)(ck_ulong session, ck_ulong user_type, unsigned char *pin,
                             ck_ulong pin_len);
typedef ck_ulong (*sign_init_fn)(ck_ulong session, void *mechanism, ck_ulong key);
typedef ck_ulong (*find_objects_init_fn)(ck_ulong session, void *template, ck_ulong count);
typedef ck_ulong (*get_function_list_fn)(struct function_list **list);

static struct function_list list;
static sign_fn real_sign;
static open_session_fn real_open_session;
static close_all_sessions_fn real_close_all_sessions;
static login_fn real_login;
static sign_init_fn real_sign_init;
static find_objects_init_fn real_find_objects_init;
static volatile ck_ulong last_slot;

static ck_ulong stalling_sign(ck_ulong session, unsigned char *data, ck_ulong data_len,
                              unsigned char *signature, ck_ulong *signature_len) {
    const char *stall = getenv("TSA_TEST_STALL_FILE");
    while (stall != NULL && access(stall, F_OK) == 0) {
        usleep(10000);
    }
    const char *drop = getenv("TSA_TEST_DROP_SESSIONS");
    if (drop != NULL && unlink(drop) == 0) {
        real_close_all_sessions(last_slot);
    }
    return real_sign(session, data, data_len, signature, signature_len);
}

static ck_ulong remembering_open_session(ck_ulong slot, ck_ulong flags, void *application,
                                         void *notify, ck_ulong *session) {
    last_slot = slot;
    return real_open_session(slot, flags, application, notify, session);
}

static ck_ulong counted_login(ck_ulong session, ck_ulong user_type, unsigned char *pin,
                              ck_ulong pin_len) {
    const char *logins = getenv("TSA_TEST_LOGINS");
    if (logins != NULL) {
        FILE *f = fopen(logins, "a");
        if (f != NULL) {
            fputs("C_Login\n", f);
            fclose(f);
        }
    }
    return real_login(session, user_type, pin, pin_len);
}

static ck_ulong key_losing_sign_init(ck_ulong session, void *mechanism, ck_ulong key) {
    const char *lose = getenv("TSA_TEST_LOSE_KEY");
    if (lose != NULL && unlink(lose) == 0) {
        return CKR_KEY_HANDLE_INVALID;
    }
    return real_sign_init(session, mechanism, key);
}

static ck_ulong failing_find_objects_init(ck_ulong session, void *template, ck_ulong count) {
    const char *fails = getenv("TSA_TEST_FIND_FAILS");
    if (fails != NULL && access(fails, F_OK) == 0) {
        return CKR_FUNCTION_FAILED;
    }
    return real_find_objects_init(session, template, count);
}

ck_ulong C_GetFunctionList(struct function_list **out) {
    if (out == NULL) {
        return CKR_ARGUMENTS_BAD;
    }
    if (real_sign == NULL) {
        const char *path = getenv("TSA_TEST_REAL_MODULE");
        void *module = path != NULL ? dlopen(path, RTLD_NOW | RTLD_LOCAL) : NULL;
        if (module == NULL) {
            return CKR_GENERAL_ERROR;
        }
        get_function_list_fn get;
        *(void **)&get = dlsym(module, "C_GetFunctionList");
        struct function_list *real = NULL;
        if (get == NULL || get(&real) != CKR_OK || real == NULL) {
            return CKR_GENERAL_ERROR;
        }
        memcpy(&list, real, sizeof list);
        real_sign = (sign_fn)list.functions[C_SIGN];
        list.functions[C_SIGN] = (void (*)(void))stalling_sign;
        real_open_session = (open_session_fn)list.functions[C_OPEN_SESSION];
        list.functions[C_OPEN_SESSION] = (void (*)(void))remembering_open_session;
        real_close_all_sessions = (close_all_sessions_fn)list.functions[C_CLOSE_ALL_SESSIONS];
        real_login = (login_fn)list.functions[C_LOGIN];
        list.functions[C_LOGIN] = (void (*)(void))counted_login;
        real_sign_init = (sign_init_fn)list.functions[C_SIGN_INIT];
        list.functions[C_SIGN_INIT] = (void (*)(void))key_losing_sign_init;
        real_find_objects_init = (find_objects_init_fn)list.functions[C_FIND_OBJECTS_INIT];
        list.functions[C_FIND_OBJECTS_INIT] = (void (*)(void))failing_find_objects_init;
    }
    *out = &list;
    return CKR_OK;
}
